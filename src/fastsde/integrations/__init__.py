"""Integrations with the libraries users sample in: whole diffusers pipelines (:mod:`.pipelines`); the
scheduler and k-diffusion's sampler signature live in :mod:`fastsde.diffusers` and
:mod:`fastsde.k_diffusion`."""
