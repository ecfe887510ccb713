"""mmLiT pre-training images/s with the whole input pipeline on the device.

The dataset sits on the device as one uint8 tensor [N, C, H, W] (CIFAR-100's 50k images are 150 MB); each step
draws a batch of indices, augments on the device as Table 3 does (RandomResizedCrop to 36 with scale [0.6, 1] and
ratio [3/4, 4/3], horizontal flip p=0.5, normalise mean = std = 0.5) with one batched `affine_grid` + `grid_sample`,
and runs a full MAE training step (forward, eq. 16 loss, backward, AdamW). No data loader, no host round trip: on a
GPU this is the setting of the issue's target (mmLiT-XXS >= 30,000 images/s on an H100, i.e. the paper's 8,000
CIFAR-100 epochs in under 4 hours).

    python benchmarks/pretrain_throughput.py --device cuda --amp-dtype bfloat16 --batch 1280 --out benchmarks/results
    python benchmarks/pretrain_throughput.py --models mlit_xxs --batch 256 --steps 5      # CPU, fp32
    python benchmarks/pretrain_throughput.py --models mlit_xxs --amp-dtype previous auto --steps 3 --repeats 5 \
        --dataset-size 5000 --out benchmarks/results       # CPU: the chosen precision against the previous path
"""
import argparse
import math
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import at_least, checked, device_here, machine, results_folder, time_interleaved, write_results  # noqa: E402,E501

import timm_mlit  # noqa: E402,F401
from timm_mlit.cli import exit_on_error  # noqa: E402
from timm_mlit.layers.dropout import torch_dropout  # noqa: E402
from timm_mlit.mae import MaskedAutoencoderMLiT  # noqa: E402
from timm_mlit.precision import auto_amp_dtype  # noqa: E402


def random_resized_crop_flip(images: torch.Tensor, size: int, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3),
                             hflip: float = 0.5, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """Batched RandomResizedCrop + horizontal flip + normalisation of uint8 images [B, C, H, W], on their device.

    Each image gets its own crop (area fraction in `scale`, aspect ratio log-uniform in `ratio`, clipped to the
    image) sampled bilinearly to size x size, as one affine grid.
    """
    B = images.shape[0]
    dev = images.device
    area = torch.empty(B, device=dev).uniform_(*scale)
    log_r = torch.empty(B, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.)  # crop width / image width
    h = torch.sqrt(area / r).clamp(max=1.)
    cx = (torch.rand(B, device=dev) * 2 - 1) * (1 - w)  # crop centre in [-1, 1], crop inside the image
    cy = (torch.rand(B, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(B, device=dev) < hflip, -1., 1.)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [B, images.shape[1], size, size], align_corners=False)
    x = F.grid_sample(images.float().div_(255.), grid, mode='bilinear', padding_mode='border', align_corners=False)
    return (x - mean) / std


@exit_on_error('pretrain_throughput.py')
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', choices=timm.list_models('mlit_*'),
                        default=['mlit_xxs', 'mlit_xs', 'mlit_s'])
    parser.add_argument('--device', type=checked(device_here), default='cpu')
    parser.add_argument('--amp-dtype', nargs='+', choices=['float32', 'bfloat16', 'float16', 'auto', 'previous'],
                        default=['float32'],
                        help='float32 (no autocast), bfloat16 or float16 autocast, auto (timm-mlit-pretrain\'s '
                             'choice for the device: timm_mlit.precision), previous (float32 with PyTorch\'s '
                             'dropout: the float32 path before the cheaper CPU mask); several: each, in turns')
    parser.add_argument('--batch', type=at_least(1), default=256)
    parser.add_argument('--dataset-size', type=at_least(1), default=50000, help='uint8 images held on the device')
    parser.add_argument('--steps', type=at_least(1), default=10, help='timed steps (after 3 warm-up steps)')
    parser.add_argument('--repeats', type=at_least(1), default=1,
                        help='timed rounds of --steps, interleaved; the median')
    parser.add_argument('--compile', action='store_true', help='torch.compile the MAE')
    parser.add_argument('--out', type=checked(results_folder), default='benchmarks/results')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # synthetic 32x32 images (CIFAR's size); the content does not change the speed
    data = torch.randint(0, 256, (args.dataset_size, 3, 32, 32), dtype=torch.uint8, device=device)

    def make_step(name: str, precision: str):
        mae = MaskedAutoencoderMLiT(name).to(device).train()
        if precision == 'previous':
            torch_dropout(mae)
        amp_dtype = auto_amp_dtype(device) if precision == 'auto' else \
            None if precision in ('float32', 'previous') else getattr(torch, precision)
        step_model = torch.compile(mae) if args.compile else mae
        opt = torch.optim.AdamW(mae.parameters(), lr=1e-4, weight_decay=0.05, fused=device.type == 'cuda')
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        def step():
            for _ in range(args.steps):
                idx = torch.randint(0, args.dataset_size, (args.batch,), device=device)
                imgs = random_resized_crop_flip(data[idx], 36)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = step_model(imgs).loss
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
        return step, amp_dtype

    rows = []
    for name in args.models:
        runs = {p: make_step(name, p) for p in args.amp_dtype}
        seconds = time_interleaved({p: fn for p, (fn, _) in runs.items()}, args.repeats, warmup=1,
                                   device=args.device)
        for precision, (_, amp_dtype) in runs.items():
            img_s = args.steps * args.batch / seconds[precision]
            rows.append(dict(model=name, precision=precision, autocast=str(amp_dtype).replace('torch.', ''),
                             batch=args.batch, img_s=img_s, cifar100_epochs_per_hour=img_s * 3600 / 50000))
            print(rows[-1], flush=True)
        first = rows[-len(runs)]
        for row in rows[-len(runs):]:
            row[f'vs_{first["precision"]}'] = row['img_s'] / first['img_s']
    command = 'python benchmarks/pretrain_throughput.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    meta = dict(machine=machine(), device=args.device, amp_dtype='_'.join(args.amp_dtype), torch=torch.__version__,
                compile=args.compile, command=command)
    write_results(args.out, f'pretrain_{args.device}_{"_".join(args.amp_dtype)}', meta, rows,
                  ['model', 'precision', 'autocast', 'batch', 'img_s', 'cifar100_epochs_per_hour',
                   f'vs_{args.amp_dtype[0]}'])


if __name__ == '__main__':
    main()
