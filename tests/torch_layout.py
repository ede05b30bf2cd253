"""Moving arrays between our NHWC numpy and PyTorch's NCHW tensors, and torch state dicts to
numpy: what every parity test against a PyTorch module needs."""
import numpy as np


def nchw(x):
  """NHWC array -> NCHW float32 torch tensor."""
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
  """NCHW torch tensor -> NHWC numpy."""
  return t.detach().numpy().transpose(0, 2, 3, 1)


def state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}
