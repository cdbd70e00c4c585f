"""Harvest: component statistics and activation examples over a dataset, on Ray Data
(`spd-ray harvest`), and the on-disk store with its queries (`Harvest`)."""
