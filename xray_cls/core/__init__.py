"""Layer 0, the core: the vocabulary every layer shares.
May import: nothing of xray_cls.

- `errors`: the errors a user can act on (one line, exit status 2);
- `options`: how an option's value is checked, and a command's options all at once;
- `task`: what a run learns: its classes and where each image's class comes from;
- `files`, `checkpoint_files`: writing files and checkpoints so that no reader sees half of one;
- `untrusted`: reading files someone sent (bounded, tag-free YAML, bounded JSON, escaped text);
- `memory`: freed memory handed back to the system;
- `legacy_names`: the names of the flat layout before the layer folders, and where they went.
"""
