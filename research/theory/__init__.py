"""depthlab.research.theory"""
