"""depthlab.train"""
