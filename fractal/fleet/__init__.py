"""The fleet core: the instance and mandelbox lifecycles, each with one owner.

Every status write in Fractal goes through ``fleet.instances.move_instances`` or
``fleet.mandelboxes.move_mandelboxes`` (creation through ``create_instance`` and ``allocate`` in the same modules):
the transition tables next to them say which status may follow which, and the movers refuse anything else by
construction (the UPDATE's WHERE only matches rows whose status may move).

Lock order, followed by every path that locks both kinds of row:
    instance rows before mandelbox rows, each set in key order (instance_name, then mandelbox_id).
Assignment locks one instance then inserts its mandelbox; a host's EXITED report locks its instance, then the
mandelbox; the sweeps lock instances (skipping locked ones), then mandelboxes. A path that locks only mandelbox
rows (a user's DELETE, a host's CONNECTING/RUNNING report) or only instance rows (drain, the scaler's moves)
cannot close a cycle with them.

Times that decide anything come from the database's clock (``fractal.clock``).
"""
