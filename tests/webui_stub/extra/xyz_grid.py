"""Stand-in of the WebUI's scripts/xyz_grid.py: AxisOption, axis_options, and a Script.run that parses values,
confirms them, orders loops by cost and renders each cell through process_images on a shallow copy of p."""
import csv
from copy import copy
from io import StringIO

from modules import processing, scripts, shared


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.choices, self.prepare = confirm, cost, choices, prepare


def format_value_add_label(p, opt, x):
    return f"{opt.label}: {x}"


def do_nothing(p, x, xs):
    pass


def apply_field(field):
    def fun(p, x, xs):
        setattr(p, field, x)
    return fun


axis_options = [AxisOption("Nothing", str, do_nothing), AxisOption("Seed", int, apply_field("seed")),
                AxisOption("Checkpoint name", str, do_nothing, cost=1.0)]


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        self.current_axis_options = list(axis_options)
        return []

    def run(self, p, x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
            z_values_dropdown, draw_legend=True, include_lone_images=True, include_sub_grids=False,
            no_fixed_seeds=False, vary_seeds_x=False, vary_seeds_y=False, vary_seeds_z=False, margin_size=0,
            csv_mode=False):
        def process_axis(opt, vals, dropdown):
            if opt.label == "Nothing":
                return [0]
            if opt.choices is not None and not csv_mode:
                valslist = list(dropdown)
            elif opt.prepare is not None:
                valslist = opt.prepare(vals)
            else:
                valslist = [x.strip() for x in next(csv.reader(StringIO(vals))) if x.strip()]
            valslist = [opt.type(x) for x in valslist]
            if opt.confirm:
                opt.confirm(p, valslist)
            return valslist

        xo, yo, zo = (self.current_axis_options[i] for i in (x_type, y_type, z_type))
        xs, ys, zs = process_axis(xo, x_values, x_values_dropdown), process_axis(yo, y_values, y_values_dropdown), \
            process_axis(zo, z_values, z_values_dropdown)
        order = sorted([("x", xo, xs), ("y", yo, ys), ("z", zo, zs)], key=lambda t: -t[1].cost)
        cells = []

        def loop(level, assignment):
            if level == 3:
                if shared.state.interrupted:
                    cells.append(None)
                    return
                pc = copy(p)
                for name, opt, vals in order:
                    opt.apply(pc, assignment[name], vals)
                cells.append(processing.process_images(pc))
                return
            name, opt, vals = order[level]
            for v in vals:
                loop(level + 1, {**assignment, name: v})

        loop(0, {})
        return cells
