"""depthlab.research.datasets"""
