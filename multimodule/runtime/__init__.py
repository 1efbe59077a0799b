"""The task runtime: finding task classes (``loader``), running one task (``runner``), and the
control daemon that hosts them (``daemon``)."""
