"""The likelihood of data under a model, through the probability-flow ODE:

- ``fastsde.likelihood.pf_ode``: ``log_likelihood`` (one batch of rows), ``bits_per_dim``,
  dequantisation, and ``LikelihoodSettings``, the one object every option travels in;
- ``fastsde.likelihood.dataset``: ``dataset_likelihood`` (a data set's rows prepared, batched and
  averaged over passes);
- ``fastsde.likelihood.sharded``: ``likelihood_to_dir`` / ``load_likelihood`` (the same as a
  resumable run folder, on the shard engine ``fastsde.shards``).

The package's public names are exported by ``fastsde`` itself; import the modules above for the rest.
"""
