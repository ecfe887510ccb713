""" Autograd ops with hand-written backwards, one per file: the MoE layer's (tests/test_moe.py checks each against
autograd through the equations, and by gradcheck), the CPU attention and dropout (tests/test_cpu_speed.py). """
from .cpu_attention import ChunkedAttention, chunked_attention
from .cpu_dropout import MaskDropout, keep_mask
from .noisy_top_k import NoisyTopKFunction, noisy_top_k
from .paired_mix import PairedExpertMix
from .sorted_mix import SortedExpertMix
