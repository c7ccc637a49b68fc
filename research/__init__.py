"""depthlab.research"""
