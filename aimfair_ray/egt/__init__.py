"""EGT (Equalized Generative Treatment, arXiv 2602.08660): min–max fine-tuning of generators
so that their quality is about equal for every sensitive group.

- :mod:`quality`: Fréchet distance in a pretrained feature space, and the EGT gap;
- :mod:`image`: the diffusion task (per-sample denoising loss, per-group quality);
- :mod:`text`: the language-model task on BOLD (per-sample NLL, per-group perplexity);
- :mod:`run`: one Ray Train loop for both, and ``aimfair egt image|text``;
- :mod:`benchmark`: ERM, reweighting, min–max (and group-conditional) over seeds.

The objective itself is :class:`aimfair_ray.minmax.Objective`.
"""
