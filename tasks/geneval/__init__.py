"""GenEval: the rules that score a detection against a prompt's metadata (`rules`) and the HTTP
server that runs the detector on a GPU machine (`server`, `opgrpo geneval-server`)."""
