"""The `encoder` entry of snapshots in EDM2's layout (docs/DESIGN.md section
4): what EDM2's generate_images.py calls to turn the network's samples into
pixels, so that our EDM2 preconditioner's snapshots sample there too.

Pickled with its source (torch_utils.persistence), so this module imports
only torch and torch_utils: its text must run wherever the pickle is opened.
"""

import torch

from torch_utils import persistence


@persistence.persistent_class
class StandardRGBEncoder:
    """Pixels scaled to [-1, 1], EDM2's StandardRGBEncoder interface:

        encode(x) = encode_latents(encode_pixels(x))   uint8 [N, C, H, W] -> float32 x / 127.5 - 1
        decode(x)                                       float [N, C, H, W] -> uint8 (x 127.5 + 128), clipped, truncated

    init(device) has nothing to load. The decoding is image_io.to_uint8's, in float32.
    """

    def init(self, device):
        pass

    def encode(self, x):
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)
