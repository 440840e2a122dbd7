"""The data wing: Flickr8k layouts and datasets, the image cache, augmentation, loaders, generated sample data."""
