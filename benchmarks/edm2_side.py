"""EDM2's side of benchmarks/check_vs_edm2.py: run in a process of its own
whose import path is a checkout of EDM2 (github.com/NVlabs/edm2) and not
this repository, so `training`, `torch_utils` and `dnnlib` are EDM2's. This
file is ours; it only calls EDM2's code, which the user provides.

    python edm2_side.py WORKDIR CONFIG_JSON build      (EDM2's nets, outputs, steps, pickles)
    python edm2_side.py WORKDIR CONFIG_JSON generate NET.pkl GNET.pkl|- GUIDANCE OUTDIR S_CHURN

build writes into WORKDIR: edm2-state.pt (the main network's float32
weights before training), edm2-reference.pt (its D and log-variance on fixed
inputs, its EDM2 losses and weights after each of the training steps),
edm2-net.pkl and edm2-gnet.pkl (EDM2's snapshot layout: ema in float16,
StandardRGBEncoder). generate writes EDM2's generate_images() PNGs for the
config's seeds on the CPU.
"""

import json
import os
import pickle
import sys

import torch

import dnnlib
from training.encoders import StandardRGBEncoder
from training.networks_edm2 import Precond
from training.training_loop import EDM2Loss, learning_rate_schedule


def build_net(cfg, seed):
    """EDM2's Precond of the config's tiny size with seeded weights; its zero-initialised
    gains (emb_gain, out_gain) set to seeded values so that every layer matters."""
    torch.manual_seed(seed)
    net = Precond(img_resolution=cfg['resolution'], img_channels=cfg['channels'], label_dim=cfg['label_dim'],
                  use_fp16=False, **cfg['unet'])
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.ndim == 0:
                param.copy_(torch.rand([]) + 0.3)
    return net


def fixed_inputs(cfg):
    gen = torch.Generator().manual_seed(123)
    n = len(cfg['sigmas'])
    x = torch.randn([n, cfg['channels'], cfg['resolution'], cfg['resolution']], generator=gen)
    labels = torch.eye(cfg['label_dim'])[torch.arange(n) % cfg['label_dim']]
    return x, torch.tensor(cfg['sigmas']), labels


def training_batches(cfg):
    gen = torch.Generator().manual_seed(456)
    shape = [cfg['batch'], cfg['channels'], cfg['resolution'], cfg['resolution']]
    return [(torch.rand(shape, generator=gen) * 2 - 1,
             torch.eye(cfg['label_dim'])[torch.randint(cfg['label_dim'], [cfg['batch']], generator=gen)])
            for _ in range(cfg['steps'])]


def build(workdir, cfg):
    net = build_net(cfg, 0)
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, os.path.join(workdir, 'edm2-state.pt'))
    x, sigma, labels = fixed_inputs(cfg)
    with torch.no_grad():
        D, logvar = net.eval()(x, sigma, labels, return_logvar=True)

    # Training steps as EDM2's loop takes them: loss summed and scaled by 1 / batch, lr of its schedule,
    # non-finite gradients zeroed, Adam (0.9, 0.99). The noise draws come from torch's global generator,
    # seeded per step so that the other side can draw the same.
    loss_fn = EDM2Loss(P_mean=cfg['P_mean'], P_std=cfg['P_std'])
    optimizer = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99), eps=1e-8)
    losses, weights = [], []
    net.train()
    for step, (images, batch_labels) in enumerate(training_batches(cfg)):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(1000 + step)
        loss = loss_fn(net=net, images=images, labels=batch_labels)
        loss.sum().mul(1 / cfg['batch']).backward()
        lr = learning_rate_schedule(cur_nimg=step * cfg['batch'], batch_size=cfg['batch'], ref_lr=cfg['lr'],
                                    ref_batches=cfg['decay'], rampup_Mimg=cfg['rampup_Mimg'])
        for group in optimizer.param_groups:
            group['lr'] = lr
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=0, neginf=0, out=param.grad)
        optimizer.step()
        losses.append(loss.detach().clone())
        weights.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    torch.save(dict(x=x, sigma=sigma, labels=labels, D=D, logvar=logvar, losses=losses, weights=weights,
                    batches=training_batches(cfg)), os.path.join(workdir, 'edm2-reference.pt'))

    for name, seed in (('edm2-net.pkl', 0), ('edm2-gnet.pkl', 1)):
        ema = build_net(cfg, seed).eval().requires_grad_(False).to(torch.float16)
        data = dnnlib.EasyDict(encoder=StandardRGBEncoder(), dataset_kwargs=dnnlib.EasyDict(), loss_fn=loss_fn,
                               ema=ema)
        with open(os.path.join(workdir, name), 'wb') as f:
            pickle.dump(data, f)


def generate(workdir, cfg, net_pkl, gnet_pkl, guidance, outdir, S_churn):
    import generate_images
    torch.distributed.init_process_group('gloo', init_method=f'file://{os.path.join(workdir, "pg")}', rank=0,
                                         world_size=1)
    kwargs = dict(guidance=float(guidance), S_churn=float(S_churn))
    if gnet_pkl != '-':
        kwargs['gnet'] = gnet_pkl
    for _ in generate_images.generate_images(net=net_pkl, outdir=outdir, seeds=cfg['seeds'], device=torch.device('cpu'),
                                             num_steps=cfg['num_steps'], verbose=False, **kwargs):
        pass
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    workdir, cfg = sys.argv[1], json.loads(sys.argv[2])
    if sys.argv[3] == 'build':
        build(workdir, cfg)
    else:
        generate(workdir, cfg, *sys.argv[4:9])
