-- wrk script for bench/capacity.py: POST /appointments/{id}/end, each id of a file once.
--   wrk -t2 -c16 -d5s -s bench/capacity_end.lua http://127.0.0.1:8080 -- ids.txt 2
-- ids.txt holds one open appointment id per line; thread k of n (n is the second argument, the
-- same as -t) ends lines k, k+n, k+2n ... in order, so no id is ended twice. A thread that runs
-- out starts its share again (those ends are repeats, cheaper than the first): the result line
-- gives "ids_used" (requests sent, repeats included), and capacity.py makes the file longer than
-- that and records any excess as "repeats".
local body = '{"end_date": "2020-12-01 15:00:00"}'
local headers = {["Content-Type"] = "application/json"}

local threads, count = {}, 0
function setup(thread)
    thread:set("index", count)
    count = count + 1
    table.insert(threads, thread)
end

local ids = {}
next_id, repeats = 1, 0  -- globals: done() reads them through thread:get
function init(args)
    local n = tonumber(args[2])
    local line_no = 0
    for line in io.lines(args[1]) do
        if line_no % n == index then
            ids[#ids + 1] = line
        end
        line_no = line_no + 1
    end
end

function request()
    if next_id > #ids then
        next_id, repeats = 1, repeats + #ids  -- (counts the wrap-around; see the header)
    end
    local id = ids[next_id]
    next_id = next_id + 1
    return wrk.format("POST", "/appointments/" .. id .. "/end", headers, body)
end

function extra_report()
    local total = 0
    for _, thread in ipairs(threads) do
        total = total + thread:get("repeats") + thread:get("next_id") - 1
    end
    return {ids_used = total}
end

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "") .. "capacity_report.lua")
