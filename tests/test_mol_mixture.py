"""MoL recovers a similarity that is a mixture of logits; an equal-budget dot product cannot
(amips.mol.synthetic: true similarity max_j <q, b_j> over two item facets)."""

import torch

from amips.mol.synthetic import fit_mixture_task


def test_mol_recovers_a_max_of_logits_that_a_dot_product_cannot():
    torch.set_num_threads(1)
    mol = fit_mixture_task("mol")
    dot = fit_mixture_task("dot")
    assert abs(mol["n_params"] - dot["n_params"]) <= 0.02 * mol["n_params"]  # same budget
    assert mol["hr@10"] >= 0.95, mol
    assert mol["hr@10"] >= dot["hr@10"] + 0.25, (mol, dot)
    assert mol["hr@1"] >= dot["hr@1"] + 0.3, (mol, dot)
