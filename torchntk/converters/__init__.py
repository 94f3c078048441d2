"""torchntk.converters"""
