"""A search and its stages: the driver of `run` and `resume` (`driver`), a stage as Tune runs it (`stage`), the
sampler and ASHA (`algorithms`), the space and the objective (`space`), the budget (`budget`), warm starts
(`warm_start`), the confirmation stage's arithmetic (`confirmation`), stopping cleanly (`stopping`), the search's
folder of Tune state (`folder`) and the record completed from it after an outage (`replay`)."""
