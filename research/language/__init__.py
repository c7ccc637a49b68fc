"""depthlab.research.language"""
