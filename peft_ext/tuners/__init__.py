"""One sub-package per method; importing a sub-package registers its peft type with PEFT."""
