"""depthlab.research.generative"""
