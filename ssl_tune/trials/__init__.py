"""One trial: its runner in the Tune trial or as a Ray Train run of DDP workers (`runner`), what it uploads to its
own MLflow run (`uploads`), and its checkpoints and exports (`checkpoints`)."""
