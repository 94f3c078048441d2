"""torchntk.bridge"""
