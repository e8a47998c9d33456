"""Layers as OCI image layers: `unionfs export`, `unionfs import`, `unionfs inspect`.

Each command works offline over the union's own rules (merge.Resolver through
diff.View, the changes log, the layer format), never through the daemon: a live
mountpoint is only used to find its upper, workdir and lowers, as `unionfs diff`
does. Nothing in this package imports pyfuse3.
"""
