"""The upstream tier of tiered inference: ``edgefleet serve-model BUNDLE``, a small HTTP service that runs a
verified bundle (often a bigger model than the devices') on the windows the devices are unsure of."""
