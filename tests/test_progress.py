"""Progress bars where they are read: plain periodic lines when stderr is not a terminal."""

import io
import logging

from dopd_vl.progress import progress_bar


def test_a_bar_into_a_file_writes_whole_lines_without_carriage_returns():
    log = io.StringIO()  # not a terminal: a CI log, a nohup or SLURM file
    for _ in progress_bar(range(3), desc="records", file=log, mininterval=0):
        pass
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[-1].startswith("records: 100%") and "3/3" in lines[-1] and all(line.strip() for line in lines)


def test_log_records_go_on_their_own_lines_while_a_bar_is_shown():
    from tqdm.contrib.logging import logging_redirect_tqdm

    log = io.StringIO()
    logger = logging.getLogger("dopd_vl.test_progress")
    handler = logging.StreamHandler(log)
    logging.getLogger().addHandler(handler)
    try:
        with logging_redirect_tqdm():
            for step in progress_bar(range(2), desc="dopd", file=log, mininterval=0):
                logger.warning("saved checkpoint-%d", step + 1)
    finally:
        logging.getLogger().removeHandler(handler)
    lines = log.getvalue().splitlines()
    assert "saved checkpoint-1" in lines and "saved checkpoint-2" in lines  # whole lines, nothing glued on
