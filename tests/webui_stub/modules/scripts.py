import collections
import os

AlwaysVisible = object()
ScriptClassData = collections.namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []
_basedir = os.getcwd()


def basedir():
    return _basedir


class Script:
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []
