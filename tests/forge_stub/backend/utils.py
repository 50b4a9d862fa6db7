def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr_raw(obj, attr, value):
    parts = attr.split(".")
    for name in parts[:-1]:
        obj = getattr(obj, name)
    setattr(obj, parts[-1], value)
