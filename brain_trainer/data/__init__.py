"""The data wing, by subject: layouts (the registry and one reader per layout), annotations (splits and what
readers share), images and the image cache, datasets, the sampler, text, augmentation, a run's loaders, and
generated sample data."""
