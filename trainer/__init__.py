"""Training of BIG5-CHAT personality adapters: dataset loading, filtering and SFT/DPO runs."""
