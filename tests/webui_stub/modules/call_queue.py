import threading

from modules import shared

queue_lock = threading.Lock()  # the WebUI's FIFOLock is not re-entrant either


def wrap_gradio_gpu_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        with queue_lock:
            shared.state.begin(job="blockmerge")
            try:
                res = list(func(*args, **kwargs))
            except Exception as e:
                return (list(extra_outputs or [])) + [f"<div class='error'>{e}</div>"]
            finally:
                shared.state.end()
        res[-1] = str(res[-1]) + "<div class='performance'></div>"
        return tuple(res)
    return f


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    return func
