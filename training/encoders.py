"""The `encoder` entry of snapshots in EDM2's layout (docs/DESIGN.md section
4): what EDM2's generate_images.py calls to turn the network's samples into
pixels, so that our EDM2 preconditioner's snapshots sample there too.

    StandardRGBEncoder   pixel models: EDM2's own pixel convention
    LatentVAEEncoder     our latent models: OUR convention (one scale factor,
                         the VAE on [-1, 1] images), not EDM2's per-channel one

Pickled with its source (torch_utils.persistence), so this module imports
only torch and torch_utils (diffusers inside `LatentVAEEncoder.init`): its
text must run wherever the pickle is opened.
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


@persistence.persistent_class
class LatentVAEEncoder:
    """Decoding of our latent models for EDM2's generate_images.py, as
    training.latents.decode_latents does it: latents / scale_factor through
    the VAE `vae_name` (a Hugging Face id or a save_pretrained folder,
    loaded by diffusers at init), whose [-1, 1] output becomes uint8 as
    (x 127.5 + 128), clipped, truncated. Decodes only: our latent datasets
    are encoded by dataset_tool.py, not by this object. The VAE itself is
    never pickled.
    """

    def __init__(self, vae_name, scale_factor, batch_size=8):
        self.vae_name = str(vae_name)
        self.scale_factor = float(scale_factor)
        self.batch_size = int(batch_size)
        self._vae = None

    def __getstate__(self):
        return dict(self.__dict__, _vae=None)

    def init(self, device):
        if self._vae is None:
            import diffusers   # only where latents are decoded
            self._vae = diffusers.AutoencoderKL.from_pretrained(self.vae_name).eval().requires_grad_(False)
        self._vae.to(device)

    def decode(self, x):
        self.init(x.device)
        z = x.to(torch.float32) / self.scale_factor
        with torch.no_grad():
            images = torch.cat([self._vae.decode(batch).sample for batch in z.split(self.batch_size)])
        return (images.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)
