import types


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.section = section

    def info(self, text):
        return self

    def needs_reload_ui(self):
        return self


def options_section(section_identifier, options_dict):
    for v in options_dict.values():
        v.section = section_identifier
    return options_dict


class Options:
    def __init__(self):
        self.data = {"sd_model_checkpoint": None}
        self.data_labels = {}

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in ("data", "data_labels"):
            raise AttributeError(item)
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def set(self, key, value, is_api=False, run_callbacks=True):
        self.data[key] = value
        return True


class State:
    def __init__(self):
        self.interrupted = False
        self.stopping_generation = False
        self.skipped = False
        self.job = ""
        self.textinfo = None
        self.job_count = 0

    def begin(self, job="(unknown)"):
        self.interrupted = False
        self.job = job

    def end(self):
        self.job = ""

    def interrupt(self):
        self.interrupted = True


opts = Options()
state = State()
cmd_opts = types.SimpleNamespace(ckpt_dir=None, api=True, nowebui=False, api_auth=None, no_hashing=False,
                                 lowvram=False, medvram=False)
