"""depthlab.research.rl"""
