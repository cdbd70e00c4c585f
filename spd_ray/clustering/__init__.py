"""Clustering subcomponents into components: the MDL merge (`merge`), its histories, the
distances between ensemble members, ensembles on Ray and the cluster mapping the viewer reads."""
