"""One adapter per diffusers model family (see `opgrpo.models.FlowPolicy`)."""
