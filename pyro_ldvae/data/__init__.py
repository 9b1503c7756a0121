"""From AnnData to minibatches: the setup registry, input checks, in-memory, on-disk and device-resident cells."""
