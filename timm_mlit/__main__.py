"""`python -m timm_mlit`: create every mLiT model and print its name, parameter count and output shape."""
import timm
import torch

import timm_mlit  # noqa: F401  (registers the models)


def main():
    x = torch.randn(2, 3, 36, 36)
    for name in timm.list_models('mlit_*'):
        model = timm.create_model(name).eval()
        with torch.no_grad():
            out = model(x)
        params = sum(p.numel() for p in model.parameters())
        print(f'{name:10s} params={params:>9,d}  input={tuple(x.shape)}  output={tuple(out.shape)}')


if __name__ == '__main__':
    main()
