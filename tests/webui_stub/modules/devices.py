import torch

fp8 = False
device = torch.device("cpu")
cpu = torch.device("cpu")
