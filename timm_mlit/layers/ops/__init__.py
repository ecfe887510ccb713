""" Autograd ops of the MoE layer, one per file, each with a hand-written backward (tests/test_moe.py checks each
against autograd through the equations, and by gradcheck). """
from .noisy_top_k import NoisyTopKFunction, noisy_top_k
from .paired_mix import PairedExpertMix
from .sorted_mix import SortedExpertMix
