"""`amoe-serve bench`: AEP vs lockstep vs transformers on one checkpoint, in one run."""
