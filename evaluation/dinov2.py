"""DINOv2 features for FD-DINOv2 (docs/DESIGN.md section 4), as EDM2 reports it.

The detector is DINOv2 ViT-L/14 (`facebook/dinov2-large` on the Hugging Face
Hub, the weights of Meta's reference code) through Hugging Face
transformers' `Dinov2Model`. Called as `detector(images, return_features=True)`
on uint8 RGB images [N, 3, H, W] (the interface of the Inception detector
in evaluation.metrics), it

    resizes the 0..255 values to 224 x 224 (bicubic, antialiased),
    divides by 255 and normalises with the ImageNet mean and std,
    returns the final-layer-normed class token [N, D] (D = 1024 for ViT-L/14).

The position embeddings (a 37 x 37 grid for 518-pixel inputs) are resampled
once to the 16 x 16 grid of a 224-pixel input, as the reference DINOv2 code
resamples them (bicubic with the scale factor (16 + 0.1) / 37), rather than
as transformers would at every call (to the output size, a slightly
different grid). transformers is imported only when a model is loaded.
"""

import math
import os

import torch

import dnnlib

DEFAULT_MODEL = 'facebook/dinov2-large'   # DINOv2 ViT-L/14, the detector of EDM2's FD-DINOv2
INSTALL_HINT = 'pip install -e ".[dinov2]"'
RESOLUTION = 224                           # the input side of FD-DINOv2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRID_OFFSET = 0.1   # the reference code's resampling of position embeddings to a grid of n: scale (n + 0.1) / M


def preprocess(images):
    """uint8 RGB [N, 3, H, W] -> float32 [N, 3, 224, 224], the network's input.

    Bicubic resize of the 0..255 values with antialiasing (EDM2's fast
    variant of dgm-eval's PIL resize), then / 255 and ImageNet normalisation.
    """
    x = torch.nn.functional.interpolate(images.to(torch.float32), size=(RESOLUTION, RESOLUTION), mode='bicubic',
                                        antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).reshape(1, 3, 1, 1)
    return (x / 255 - mean) / std


def resample_position_embeddings(embeddings, grid):
    """Position embeddings [1, 1 + M * M, D] -> [1, 1 + grid * grid, D].

    The class token's embedding stays; the M x M patch grid is resampled to
    grid x grid as the reference DINOv2 code does for an input of grid
    patches: bicubic (a = -0.75, no antialiasing) in float32 with the scale
    factor (grid + 0.1) / M, so output cell i samples the source at
    (i + 0.5) * M / (grid + 0.1) - 0.5.
    """
    patches = embeddings[:, 1:]
    side, dim = math.isqrt(patches.shape[1]), patches.shape[2]
    if side * side != patches.shape[1]:
        raise ValueError(f'The position embeddings hold {patches.shape[1]} patches, not a square grid')
    if side == grid:
        return embeddings
    scale = (grid + GRID_OFFSET) / side
    square = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).to(torch.float32)
    square = torch.nn.functional.interpolate(square, scale_factor=(scale, scale), mode='bicubic', align_corners=False)
    assert square.shape[2:] == (grid, grid)   # floor(M * scale) = grid for an offset below 1
    resampled = square.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(embeddings.dtype)
    return torch.cat([embeddings[:, :1], resampled], dim=1)


class DINOv2Features(torch.nn.Module):
    """FD-DINOv2's detector around a transformers Dinov2Model (which it adapts
    to 224-pixel inputs in place): uint8 RGB [N, 3, H, W] -> float32 [N, D]."""

    def __init__(self, model):
        super().__init__()
        patch_size = model.config.patch_size
        if RESOLUTION % patch_size:
            raise ValueError(f'A DINOv2 model with patch size {patch_size} does not tile {RESOLUTION}-pixel inputs')
        embeddings = model.embeddings
        with torch.no_grad():
            resampled = resample_position_embeddings(embeddings.position_embeddings, RESOLUTION // patch_size)
        # At 224 pixels transformers now finds a grid of the input's size and uses these as they are.
        embeddings.position_embeddings = torch.nn.Parameter(resampled, requires_grad=False)
        self.model = model
        self.eval().requires_grad_(False)

    def forward(self, images, return_features=True):
        with torch.no_grad():
            return self.model(pixel_values=preprocess(images)).pooler_output   # the layer-normed class token


def load_dinov2(id_or_dir=DEFAULT_MODEL, device='cpu'):
    """DINOv2Features of the Dinov2Model at a Hugging Face Hub id (through the
    Hub's cache) or in a local folder written by `save_pretrained`, float32,
    on `device`.

    ValueError (one line, saying what to do) when transformers is missing,
    the folder does not exist, the model cannot be loaded (e.g. an id that is
    not in the cache on an offline machine) or the files lack weights.
    """
    try:
        from transformers import Dinov2Model
    except ImportError as err:
        raise ValueError(f'FD-DINOv2 needs the transformers package ({err}); install it with: {INSTALL_HINT}') from None
    id_or_dir = os.fspath(id_or_dir)
    is_folder = os.path.isdir(id_or_dir)
    looks_local = id_or_dir.startswith(('.', '/', '~')) or id_or_dir.count('/') != 1   # a Hub id is OWNER/NAME
    if not is_folder and (os.path.exists(id_or_dir) or looks_local):
        raise ValueError(f'DINOv2 model {id_or_dir}: no such folder; give a folder written by save_pretrained or a '
                         f'Hugging Face Hub id such as {DEFAULT_MODEL}')
    fix = ('check the folder' if is_folder else
           'check the id and the connection to the Hugging Face Hub, or copy the model on a machine that has '
           'one (Dinov2Model.from_pretrained(ID).save_pretrained(DIR)) and give that folder: fid.py --dinov2=DIR, '
           'train.py --metric-dinov2=DIR')
    save_hint = (f'on a machine that has a network save it with Dinov2Model.from_pretrained("{id_or_dir}")'
                 f'.save_pretrained(DIR) and give that folder: fid.py --dinov2=DIR, train.py --metric-dinov2=DIR')
    where = f'{"folder" if is_folder else "Hub id"} {id_or_dir}'
    model, info = dnnlib.util.load_pretrained(
        lambda **kwargs: Dinov2Model.from_pretrained(id_or_dir, output_loading_info=True, **kwargs),
        'the DINOv2 model', where, not is_folder, save_hint, fix)
    missing = sorted(info['missing_keys'])
    if missing:
        raise ValueError(f'The DINOv2 model in {where} has no weights for {len(missing)} parameters '
                         f'(e.g. {missing[0]}); give a complete model (Dinov2Model.save_pretrained)')
    return DINOv2Features(model.to(torch.float32)).to(torch.device(device))
