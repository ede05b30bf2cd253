"""The demo's synthetic world (CPU, no downloads): rendered shapes, the frozen base's sample pool,
pixel-measured properties, synthetic people and reward users with hidden rewards, and the hash
text encoder. The real data pipeline (Pick-a-Pic, precompute, shards, relabel) is data/ itself."""
