"""torchntk.torch_native"""
