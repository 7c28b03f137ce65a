"""The synthetic benchmark: its shards (``dataset``) and the demo pipeline over them (``demo``).
Its recipe is ``sdn_dist/recipes/synth.yaml`` (config values, resolved by the library's config)."""
