import faulthandler, os, sys
faulthandler.dump_traceback_later(int(os.environ.get("DUMP_AFTER", "80")), exit=True, file=sys.stderr)
