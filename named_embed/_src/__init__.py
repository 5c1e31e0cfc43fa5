"""named_embed's implementation, in layers that import strictly downward.

base < rows < tables < ops < tools < files: a module imports modules of its
own layer or of lower ones at module level, never higher ones. A method that
must build something of a higher layer (a table method returning a resized
table or an HTML page) imports it inside the method, with a comment saying
why. The public names live in `named_embed` (and `named_embed.formats`,
`named_embed.sharding`); nothing here is public API.
"""
