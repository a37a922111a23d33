"""Judging an artifact: the legality checks of `verify`, and the statistics and records folder of
`runs` and `record`."""
