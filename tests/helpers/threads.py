"""Run code that might block for good, and fail instead of hanging the suite"""
import threading


def finishes(function, seconds=20):
    """Call `function` in a thread and return its result; fail instead of hanging the suite"""
    result, raised = [], []

    def call():
        try:
            result.append(function())
        except BaseException as error:  # handed to the test below
            raised.append(error)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function} blocks for good"
    if raised:
        raise raised[0]
    return result[0]
