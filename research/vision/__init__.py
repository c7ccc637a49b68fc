"""depthlab.research.vision"""
